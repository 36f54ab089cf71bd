from examples.mean_teacher.digits import main

main()
